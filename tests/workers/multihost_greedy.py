"""One of two processes on loopback (jax.distributed, CPU collectives over gloo), one CPU device
each: a tp=2 mesh spans both processes. Process 0 generates and prints the tokens as JSON;
process 1 follows its steps. Usage: multihost_greedy.py ROOT PROCESS_ID PORT"""

import json
import sys

sys.path.insert(0, sys.argv[1])
pid, port = int(sys.argv[2]), int(sys.argv[3])

from jaxserve.distributed import initialize  # noqa: E402

initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)

import jax  # noqa: E402

from jaxserve import LLM, SamplingParams  # noqa: E402
from tests.engine_fixtures import tiny_loaded  # noqa: E402

assert jax.process_count() == 2 and len(jax.devices()) == 2 and len(jax.local_devices()) == 1
prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (1, 9, 30)]
sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
llm = LLM(tiny_loaded(seed=13), mesh="tp=2", max_model_len=64, max_num_seqs=4,
          max_num_batched_tokens=32, block_size=8, compilation_cache_dir=None,
          show_progress=True)   # planned KV pages and the start-up memory line, on every process
wqkv = llm.loaded.model.layers[0].attn.wqkv[...]
if jax.process_index() == 0:
    outs = llm.generate(prompts, sp, use_tqdm=False)
    seeded = llm.generate(prompts[:1], SamplingParams(temperature=0.8, seed=3, max_tokens=8),
                          use_tqdm=False)
    llm.shutdown()
    print("RESULT " + json.dumps({
        "tokens": [o.outputs[0].token_ids for o in outs],
        "seeded": seeded[0].outputs[0].token_ids,
        "wqkv_spec": str(wqkv.sharding.spec), "spans_processes": not wqkv.is_fully_addressable,
        "spmd": llm.engine.runner._tp_specs is not None,
        "compiles_after_warmup": llm.get_stats()["compiles_after_warmup"]}), flush=True)
else:
    print(f"FOLLOWED {llm.follow()}", flush=True)
