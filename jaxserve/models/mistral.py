"""Mistral: the Llama block with an optional sliding attention window (read from the config)."""

from jaxserve.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    """Same weights and blocks as Llama; `sliding_window` reaches the attention spec via the config."""
