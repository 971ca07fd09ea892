"""`jaxserve cost`: what a token costs on your own GPUs, beside a hosted API's price.

Inputs: one `jaxserve bench throughput|serve --output-json` result (its total token throughput
and its input/output token counts), the price of a GPU-hour, how many GPUs the measured run used,
and the fraction of the day they serve at the measured throughput (`utilization`).

The arithmetic (D = seconds in a day, 86,400):

    daily cost        = gpu_hour_usd * 24 * num_gpus                 paid whatever the load
    daily capacity    = total_token_throughput * D * utilization     tokens (input + output)
    $ per 1M tokens   = daily cost / daily capacity * 1e6

The split between input and output is by token counts: every token of the measured run, prompt
or generated, is charged the same share of GPU time, so input and output get the same price. A
throughput run interleaves prefill and decode in the same steps, so its time has no exact
per-kind split; the equal share keeps the total cost of the measured workload exact, and the
break-even below prices the same mix on both sides, so it does not depend on the split at all.

The hosted API costs `api_input_usd_per_mtok` and `api_output_usd_per_mtok` per 1M tokens. For
the measured mix (a fraction f_in of the tokens are input) it costs, per 1M tokens of that mix,

    api blended       = f_in * api_input + (1 - f_in) * api_output

and self-hosting breaks even at a daily volume of `daily cost / api blended * 1e6` tokens: below
it the API is cheaper; above it, up to the daily capacity, the GPUs are. Past the capacity one
more deployment is needed, another `daily cost` a day (the steps in `--plot`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math

SECONDS_PER_DAY = 86_400
SPLIT = "by token counts: each input or output token of the measured run is charged the same " \
        "share of GPU time"


@dataclasses.dataclass(frozen=True)
class Workload:
    """What a bench JSON measured."""
    name: str                     # "<benchmark> <model> on <device>"
    total_token_throughput: float  # (input + output) tokens / s, whole run
    input_tokens: int             # prompt tokens of the run
    output_tokens: int            # generated tokens of the run

    @property
    def input_fraction(self) -> float:
        return self.input_tokens / (self.input_tokens + self.output_tokens)

    @classmethod
    def from_bench(cls, res: dict) -> "Workload":
        missing = [k for k in ("total_token_throughput", "total_input_tokens", "total_output_tokens")
                   if k not in res]
        if missing:
            raise ValueError(f"the bench JSON has no {', '.join(missing)}: use the output of "
                             "`jaxserve bench throughput` or `jaxserve bench serve` (not latency)")
        tput = float(res["total_token_throughput"])
        n_in, n_out = int(res["total_input_tokens"]), int(res["total_output_tokens"])
        if tput <= 0 or n_in + n_out <= 0:
            raise ValueError("the bench JSON measured no tokens")
        name = " ".join(str(x) for x in (res.get("benchmark", "bench"), res.get("model") or "",
                                         f"on {res['device']}" if res.get("device") else "") if x)
        return cls(name, tput, n_in, n_out)


@dataclasses.dataclass(frozen=True)
class CostReport:
    workload: Workload
    gpu_hour_usd: float
    num_gpus: int
    utilization: float                    # fraction of the day serving at the measured rate
    api_input_usd_per_mtok: float | None
    api_output_usd_per_mtok: float | None

    @property
    def daily_cost_usd(self) -> float:
        return self.gpu_hour_usd * 24 * self.num_gpus

    @property
    def daily_capacity_tokens(self) -> float:
        return self.workload.total_token_throughput * SECONDS_PER_DAY * self.utilization

    @property
    def self_usd_per_mtok(self) -> float:
        """Input and output alike (the split by token counts)."""
        return self.daily_cost_usd / self.daily_capacity_tokens * 1e6

    @property
    def has_api(self) -> bool:
        return self.api_input_usd_per_mtok is not None and self.api_output_usd_per_mtok is not None

    @property
    def api_blended_usd_per_mtok(self) -> float:
        f = self.workload.input_fraction
        return f * self.api_input_usd_per_mtok + (1 - f) * self.api_output_usd_per_mtok

    @property
    def break_even_tokens_per_day(self) -> float:
        """Daily volume (measured mix) at which the API's bill equals the GPUs' daily cost."""
        blended = self.api_blended_usd_per_mtok
        return math.inf if blended <= 0 else self.daily_cost_usd / blended * 1e6

    def self_cost_per_day(self, tokens: float) -> float:
        """Deployments needed for `tokens` a day (at least one, always on) times the daily cost."""
        return max(1, math.ceil(tokens / self.daily_capacity_tokens)) * self.daily_cost_usd

    def api_cost_per_day(self, tokens: float) -> float:
        return tokens * self.api_blended_usd_per_mtok / 1e6

    def text(self) -> str:
        w = self.workload
        f = w.input_fraction
        lines = [
            f"measured: {w.name}",
            f"  {w.total_token_throughput:,.1f} total tok/s; {w.input_tokens:,} input + "
            f"{w.output_tokens:,} output tokens ({f:.1%} input)",
            f"GPUs: {self.num_gpus} x ${self.gpu_hour_usd:.2f}/h = ${self.daily_cost_usd:,.2f}/day; "
            f"serving {self.utilization:.0%} of the day: {_tokens(self.daily_capacity_tokens)} "
            "tokens/day",
            f"split: {SPLIT}",
            f"{'':<12}{'$/1M input':>12}{'$/1M output':>13}{'$/1M of this mix':>18}",
            f"{'self-hosted':<12}{self.self_usd_per_mtok:>12.4f}{self.self_usd_per_mtok:>13.4f}"
            f"{self.self_usd_per_mtok:>18.4f}",
        ]
        if not self.has_api:
            lines.append("(give --api-input-usd-per-mtok and --api-output-usd-per-mtok to compare "
                         "with a hosted API and get the break-even volume)")
            return "\n".join(lines)
        lines.append(f"{'hosted API':<12}{self.api_input_usd_per_mtok:>12.4f}"
                     f"{self.api_output_usd_per_mtok:>13.4f}{self.api_blended_usd_per_mtok:>18.4f}")
        be = self.break_even_tokens_per_day
        if math.isinf(be):
            lines.append("break-even: never (the API is free for this mix)")
        else:
            lines.append(f"break-even: {_tokens(be)} tokens/day of this mix ({_tokens(be * f)} input"
                         f" + {_tokens(be * (1 - f))} output) = {be / self.daily_capacity_tokens:.1%}"
                         " of the daily capacity")
            if be > self.daily_capacity_tokens:
                lines.append("  beyond the capacity: at this utilization the API is cheaper at "
                             "every volume")
            else:
                lines.append(f"  below it the API is cheaper; at full capacity self-hosting costs "
                             f"{self.self_usd_per_mtok / self.api_blended_usd_per_mtok:.1%} of "
                             "the API")
        return "\n".join(lines)


def _tokens(n: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:,.2f}{suffix}"
    return f"{n:,.0f}"


def plot(report: CostReport, path: str) -> None:
    """Cost per day against daily volume: the GPUs' steps beside the API's line."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install matplotlib") from None
    cap = report.daily_capacity_tokens
    top = 3 * cap
    if report.has_api and not math.isinf(report.break_even_tokens_per_day):
        top = max(top, 1.5 * report.break_even_tokens_per_day)
    xs = [top * i / 600 for i in range(601)]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([x / 1e9 for x in xs], [report.self_cost_per_day(x) for x in xs],
            label=f"self-hosted ({report.num_gpus} GPU x ${report.gpu_hour_usd:.2f}/h per deployment)")
    if report.has_api:
        ax.plot([x / 1e9 for x in xs], [report.api_cost_per_day(x) for x in xs],
                label=f"hosted API (${report.api_blended_usd_per_mtok:.3f}/1M of this mix)")
        be = report.break_even_tokens_per_day
        if be <= top:
            ax.axvline(be / 1e9, color="gray", linestyle=":", label=f"break-even {_tokens(be)}/day")
    ax.set_xlabel("tokens per day, billions (measured input/output mix)")
    ax.set_ylabel("$ per day")
    ax.set_title(f"{report.workload.name}, serving {report.utilization:.0%} of the day", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bench-json", required=True,
                   help="a `jaxserve bench throughput|serve --output-json` result")
    p.add_argument("--gpu-hour-usd", type=float, required=True, help="price of one GPU for one hour")
    p.add_argument("--num-gpus", type=int, default=1, help="GPUs the measured run used (tp x dp)")
    p.add_argument("--utilization", type=float, default=0.5,
                   help="fraction of the day the GPUs serve at the measured throughput")
    p.add_argument("--api-input-usd-per-mtok", type=float, default=None,
                   help="a hosted API's price per 1M input tokens")
    p.add_argument("--api-output-usd-per-mtok", type=float, default=None,
                   help="a hosted API's price per 1M output tokens")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="draw cost per day against daily volume (needs matplotlib)")


def report_from_args(args) -> CostReport:
    if not 0 < args.utilization <= 1:
        raise ValueError(f"--utilization must be in (0, 1], got {args.utilization}")
    if args.num_gpus < 1 or args.gpu_hour_usd < 0:
        raise ValueError("--num-gpus must be at least 1 and --gpu-hour-usd not negative")
    if (args.api_input_usd_per_mtok is None) != (args.api_output_usd_per_mtok is None):
        raise ValueError("give both --api-input-usd-per-mtok and --api-output-usd-per-mtok")
    with open(args.bench_json) as f:
        res = json.load(f)
    return CostReport(Workload.from_bench(res), args.gpu_hour_usd, args.num_gpus, args.utilization,
                      args.api_input_usd_per_mtok, args.api_output_usd_per_mtok)


def cmd_cost(args) -> int:
    report = report_from_args(args)
    if args.plot:   # first: without matplotlib the command fails before printing anything
        plot(report, args.plot)
    print(report.text())
    if args.plot:
        print(f"plot: {args.plot}")
    return 0
