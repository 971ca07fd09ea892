"""TemplateSandbox: untrusted chat templates render in worker processes under time, output and
memory budgets, with the same text as transformers' `apply_chat_template` for ordinary templates."""

import asyncio
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from jaxserve.server.templates import TemplateRenderError, TemplateSandbox

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER = [{"role": "user", "content": "hi"}]
SIMPLE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"
NESTED_LOOPS = "{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}"

# Exercises what transformers' environment adds: trim/lstrip blocks, loop controls, `tojson` with
# options, `dict`, `namespace`, `{% generation %}`, special tokens, tools/documents defaults, and
# the message normalisation (null keys dropped, reasoning aliased to `reasoning_content`/`thinking`).
RICH = textwrap.dedent("""\
    {%- set ns = namespace(n=0) -%}
    {{ bos_token }}
    {% for m in messages %}
      {% if m.role == 'skip' %}{% continue %}{% endif %}
      {% set ns.n = ns.n + 1 %}
      <{{ m.role }}>{{ m.content | tojson }}
      {% if m.reasoning_content is defined %}[{{ m.reasoning_content }}|{{ m.thinking }}]{% endif %}
      {% if m.name is defined %}name={{ m.name }}{% endif %}
      {% if m.role == 'assistant' %}{% generation %}{{ m.content }}{{ eos_token }}{% endgeneration %}{% endif %}
      {% if loop.index > 10 %}{% break %}{% endif %}
    {% endfor %}
    {{ dict(b=[1, 2], a='é') | tojson(indent=2, sort_keys=True) }}
    {{ tools | tojson }} {{ documents is none }} {{ unk_token is defined }} {{ enable_thinking | default('unset') }}
    {% if add_generation_prompt %}<assistant>{% endif %}
    count={{ ns.n }}
    """)
RICH_MESSAGES = [
    {"role": "system", "content": "Be nice"},
    {"role": "user", "content": 'héllo "q" \n', "name": None},
    {"role": "skip", "content": "x"},
    {"role": "assistant", "content": "ok", "reasoning": "think"},
    {"role": "user", "content": "bye", "name": "bob"},
]


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def tokenizer():
    from jaxserve.loading import default_model_path
    from jaxserve.loading.gguf_loader import GGUFCheckpoint
    return GGUFCheckpoint(default_model_path()).tokenizer()


@pytest.fixture(scope="module")
def sandbox():
    sb = TemplateSandbox(workers=2, timeout_s=0.5)
    yield sb
    sb.close()


def render(sb, template, messages=USER, **kw):
    kw.setdefault("add_generation_prompt", True)
    kw.setdefault("special_tokens", {})
    return run(sb.render(template, messages, **kw))


def test_smollm_template_renders_like_transformers(sandbox, tokenizer):
    conversations = [
        USER,
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}, {"role": "user", "content": "ünïcode ✓ {{ x }}"}],
    ]
    for messages in conversations:
        for add_gen in (True, False):
            want = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_gen)
            got = render(sandbox, tokenizer.chat_template, messages, add_generation_prompt=add_gen,
                         special_tokens=tokenizer.special_tokens_map)
            assert got == want


def test_environment_matches_transformers(sandbox, tokenizer):
    for add_gen in (True, False):
        want = tokenizer.apply_chat_template(RICH_MESSAGES, tokenize=False, chat_template=RICH,
                                             add_generation_prompt=add_gen, enable_thinking=True)
        got = render(sandbox, RICH, RICH_MESSAGES, add_generation_prompt=add_gen,
                     special_tokens=tokenizer.special_tokens_map, extra={"enable_thinking": True})
        assert got == want
    # Template helpers behave the same, including their refusals.
    with pytest.raises(TemplateRenderError, match="nope"):
        render(sandbox, "{{ raise_exception('nope') }}")
    with pytest.raises(TemplateRenderError, match="underscore"):
        render(sandbox, "{% set ns = namespace(_x=1) %}")
    assert render(sandbox, "{{ strftime_now('%Y') }}") == time.strftime("%Y")


def test_nested_loops_time_out_and_the_sandbox_recovers(sandbox):
    t0 = time.monotonic()
    with pytest.raises(TemplateRenderError, match=r"took longer than 0\.5 s"):
        render(sandbox, NESTED_LOOPS)
    assert time.monotonic() - t0 < sandbox.timeout_s + 1.0
    assert render(sandbox, SIMPLE) == "<user>hi<a>"


def test_huge_output_stops_at_the_output_budget(sandbox):
    t0 = time.monotonic()
    # 200 MB of text if it were allowed to finish.
    with pytest.raises(TemplateRenderError, match="longer than 4000000 characters"):
        render(sandbox, "{% for i in range(100000) %}{{ 'x' * 2000 }}{% endfor %}")
    assert time.monotonic() - t0 < 1.0


def test_huge_allocation_hits_the_memory_limit(sandbox):
    parent_pid = os.getpid()
    with pytest.raises(TemplateRenderError, match="too much memory"):
        render(sandbox, "{{ 'a' * 10**10 }}")
    with pytest.raises(TemplateRenderError, match="too much memory"):
        render(sandbox, "{{ 'a' * 10**9 }}")  # 1 GB: under RLIMIT_AS of 1 GiB it cannot fit
    assert os.getpid() == parent_pid
    assert render(sandbox, SIMPLE) == "<user>hi<a>"


def test_errors_are_client_messages(sandbox):
    with pytest.raises(TemplateRenderError, match="syntax error in the chat template at line 2") as e:
        render(sandbox, "ok\n{% if %}")
    assert "Error" not in str(e.value) and "/" not in str(e.value)
    for escape in ("{{ ''.__class__.__mro__ }}", "{{ messages.__class__.__base__.__subclasses__() }}",
                   "{{ cycler.__init__.__globals__.os }}", "{{ ''.__class__.__mro__[1].__subclasses__() }}"):
        with pytest.raises(TemplateRenderError, match="unsafe") as e:
            render(sandbox, escape)
        assert "SecurityError" not in str(e.value)
    with pytest.raises(TemplateRenderError, match="'foo' is undefined"):
        render(sandbox, "{{ foo.bar }}")
    with pytest.raises(TemplateRenderError, match="division by zero") as e:
        render(sandbox, "{{ 1 / 0 }}")
    assert "ZeroDivisionError" not in str(e.value)
    with pytest.raises(TemplateRenderError, match="recursed too deeply"):
        render(sandbox, "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}")
    with pytest.raises(TemplateRenderError, match="conversation is empty"):
        render(sandbox, SIMPLE, [])
    with pytest.raises(TemplateRenderError, match="JSON"):
        render(sandbox, SIMPLE, [{"role": "user", "content": object()}])
    with pytest.raises(TemplateRenderError, match="messages"):
        render(sandbox, SIMPLE, extra={"messages": []})
    assert render(sandbox, SIMPLE) == "<user>hi<a>"


def test_concurrent_renders(sandbox):
    async def many():
        return await asyncio.gather(*(
            sandbox.render(SIMPLE, [{"role": "user", "content": str(i)}], add_generation_prompt=False,
                           special_tokens={}) for i in range(12)))
    assert run(many()) == [f"<user>{i}" for i in range(12)]


def test_hostile_and_ordinary_renders_interleave():
    sb = TemplateSandbox(workers=2, timeout_s=1.0)
    try:
        async def both():
            slow = asyncio.ensure_future(sb.render(NESTED_LOOPS, USER, add_generation_prompt=True,
                                                   special_tokens={}))
            await asyncio.sleep(0.05)
            t0 = time.monotonic()
            fast = [await sb.render(SIMPLE, USER, add_generation_prompt=False, special_tokens={})
                    for _ in range(5)]
            fast_s = time.monotonic() - t0
            with pytest.raises(TemplateRenderError, match="took longer"):
                await slow
            return fast, fast_s
        fast, fast_s = run(both())
        assert fast == ["<user>hi"] * 5
        assert fast_s < 0.9  # served by the other worker while the first was stuck
    finally:
        sb.close()


def test_a_worker_killed_from_outside_is_replaced():
    sb = TemplateSandbox(workers=1, timeout_s=30.0)
    try:
        assert render(sb, SIMPLE) == "<user>hi<a>"
        (pid,) = sb.worker_pids()
        os.kill(pid, signal.SIGKILL)  # dies while idle
        time.sleep(0.05)
        assert render(sb, SIMPLE) == "<user>hi<a>"
        (pid,) = sb.worker_pids()

        async def killed_mid_render():
            task = asyncio.ensure_future(sb.render(NESTED_LOOPS, USER, add_generation_prompt=True,
                                                   special_tokens={}))
            await asyncio.sleep(0.2)
            os.kill(pid, signal.SIGKILL)
            t0 = time.monotonic()
            with pytest.raises(TemplateRenderError, match="stopped unexpectedly"):
                await task
            return time.monotonic() - t0
        assert run(killed_mid_render()) < 1.0
        assert render(sb, SIMPLE) == "<user>hi<a>"
        assert pid not in sb.worker_pids()
    finally:
        sb.close()


def test_cancelled_render_does_not_leave_a_busy_worker():
    sb = TemplateSandbox(workers=1, timeout_s=30.0)
    try:
        async def cancel_then_render():
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(sb.render(NESTED_LOOPS, USER, add_generation_prompt=True,
                                                 special_tokens={}), 0.3)
            return await sb.render(SIMPLE, USER, add_generation_prompt=True, special_tokens={})
        assert run(cancel_then_render()) == "<user>hi<a>"
    finally:
        sb.close()


def test_close_leaves_no_child_processes():
    sb = TemplateSandbox(workers=3, timeout_s=1.0)

    async def busy():
        await asyncio.gather(*(sb.render(SIMPLE, USER, add_generation_prompt=True, special_tokens={})
                               for _ in range(6)))
    run(busy())
    pids = sb.worker_pids()
    assert len(pids) == 3
    assert {p.pid for p in multiprocessing.active_children()} >= set(pids)
    sb.close()
    sb.close()  # idempotent
    assert not set(pids) & {p.pid for p in multiprocessing.active_children()}
    for pid in pids:
        with pytest.raises(ChildProcessError):  # already reaped: no zombies left behind
            os.waitpid(pid, os.WNOHANG)
    with pytest.raises(TemplateRenderError, match="closed"):
        render(sb, SIMPLE)


def test_workers_do_not_load_jax(sandbox):
    import jax  # noqa: F401  (the parent has it, as the server does)

    render(sandbox, SIMPLE)
    for pid in sandbox.worker_pids():
        with open(f"/proc/{pid}/maps") as f:
            maps = f.read()
        assert "jaxlib" not in maps and "xla_extension" not in maps


def test_workers_do_not_rerun_the_main_script(tmp_path):
    marker = tmp_path / "imports"
    script = tmp_path / "serve.py"
    script.write_text(textwrap.dedent(f"""\
        import asyncio
        open({str(marker)!r}, "a").write("x")  # top-level side effect, no __main__ guard
        from jaxserve.server.templates import TemplateSandbox
        sb = TemplateSandbox(workers=1)
        print(asyncio.run(sb.render("{{{{ messages[0].content }}}}", [{{"role": "user", "content": "ok"}}],
                                    add_generation_prompt=True, special_tokens={{}})))
        sb.close()
        """))
    out = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    assert marker.read_text() == "x"
