"""The Hugging Face transformers side of the parity tests. Runs under an interpreter with torch.

jaxserve itself never imports torch; the tests run this script in a separate process (see
tests/conftest.py for how the interpreter is found) and compare against what it writes.

    python hf_reference.py PLAN.json

PLAN.json: {"jobs": [job, ...]} where a job is one of
  {"kind": "tiny", "name", "config": {model_type, ...}, "seed", "out_dir", "max_shard_size"?,
   "prompts": [[ids]], "max_new_tokens"}
      build a random model with transformers, randomise every parameter (biases and norms too),
      save it as safetensors in out_dir, then run the prompts
  {"kind": "gguf", "name", "path", "out_dir", "prompts", "max_new_tokens"}
      load a GGUF file with transformers (dequantized, float32) and run the prompts
  {"kind": "tokenize", "name", "path", "out_dir", "texts": [str]}
      encode texts with transformers' GGUF tokenizer
Each job writes out_dir/reference.npz: prompt_logits_<i> [len, V], tokens_<i> [n], step_logits_<i>
[n, V] (greedy, eos ignored), or ids_<i> for tokenize jobs.
"""

import json
import os
import sys

import numpy as np
import torch

torch.set_num_threads(max(1, os.cpu_count() or 1))


def _randomize(model, seed: int, std: float) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32) * std
            if name.endswith("norm.weight"):
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise)


def _run_prompts(model, prompts, max_new_tokens):
    out = {}
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    for i, ids in enumerate(prompts):
        x = torch.tensor([ids], dtype=torch.long)
        with torch.no_grad():
            out[f"prompt_logits_{i}"] = model(x).logits[0].float().numpy()
            gen = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                 min_new_tokens=max_new_tokens, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
        out[f"tokens_{i}"] = gen.sequences[0, len(ids):].numpy()
        out[f"step_logits_{i}"] = torch.stack(gen.logits, 0)[:, 0].float().numpy()
    return out


def run_job(job):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    os.makedirs(job["out_dir"], exist_ok=True)
    if job["kind"] == "tiny":
        cfg_kw = dict(job["config"])
        model_type = cfg_kw.pop("model_type")
        config = AutoConfig.for_model(model_type, **cfg_kw)
        torch.manual_seed(job["seed"])
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        _randomize(model, job["seed"], job.get("std", 0.1))
        if config.tie_word_embeddings:
            model.tie_weights()
        model.eval()
        model.save_pretrained(job["out_dir"], max_shard_size=job.get("max_shard_size", "10GB"))
        out = _run_prompts(model, job["prompts"], job["max_new_tokens"])
    elif job["kind"] == "gguf":
        d, f = os.path.split(job["path"])
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
        out = _run_prompts(model, job["prompts"], job["max_new_tokens"])
    elif job["kind"] == "tokenize":
        d, f = os.path.split(job["path"])
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        out = {f"ids_{i}": np.asarray(tok.encode(t, add_special_tokens=False), np.int64)
               for i, t in enumerate(job["texts"])}
    else:
        raise ValueError(f"unknown job kind {job['kind']!r}")
    np.savez(os.path.join(job["out_dir"], "reference.npz"), **out)


def main():
    with open(sys.argv[1]) as f:
        plan = json.load(f)
    for job in plan["jobs"]:
        run_job(job)
        print(f"reference: {job['name']} done", flush=True)


if __name__ == "__main__":
    main()
