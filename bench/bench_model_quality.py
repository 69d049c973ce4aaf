"""How close the served 4-bit model stays to the fp32 (GGUF-dequantized) model.

Scores a fixed text (the first held-out-style passage of the CPython language reference) three ways:
HF transformers fp32 from the GGUF, HF with the 4-bit weights (dequantized), and vLLM's prompt
log-probs on the checkpoint the server would load. Reports mean NLL per token, the NLL gap, the
mean absolute per-token log-prob difference and greedy top-1 agreement.

    .venv/bin/python bench/bench_model_quality.py [--model-dir DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def fixed_text_ids(tokenizer, tokens: int = 512) -> list[int]:
    from pydoc_data.topics import topics

    text = topics["class"] + "\n" + topics["for"]
    return tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]


@torch.no_grad()
def hf_token_logprobs(model, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(token_t | tokens_<t) for t >= 1, and the argmax predictions."""
    logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    target = torch.tensor(ids[1:])
    return logprobs.gather(1, target[:, None])[:, 0], logprobs.argmax(-1)


def vllm_token_logprobs(model_dir: str, ids: list[int]) -> torch.Tensor:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model_dir, enforce_eager=True, dtype="bfloat16", max_model_len=1024, seed=0,
              kv_cache_memory_bytes=1 << 30)
    out = llm.generate(
        [TokensPrompt(prompt_token_ids=ids)], SamplingParams(max_tokens=1, prompt_logprobs=0)
    )[0]
    values = [entry[tok].logprob for tok, entry in zip(ids[1:], out.prompt_logprobs[1:])]
    return torch.tensor(values)


def main() -> None:
    from artefacts import checkpoint, paths
    from server.model import prepare as model_prep

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=str(paths.default_model_dir()))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    fp32_model, tokenizer = model_prep.load_dense(model_prep.default_gguf_path())
    ids = fixed_text_ids(tokenizer)
    ref, ref_top1 = hf_token_logprobs(fp32_model, ids)
    del fp32_model

    dense_dir = checkpoint.ensure_dense_copy(__import__("pathlib").Path(args.model_dir))
    q_model, _ = model_prep.load_dense(dense_dir)
    q_model = q_model.float()
    quant, quant_top1 = hf_token_logprobs(q_model, ids)
    del q_model

    served_dir, served_what = checkpoint.served_checkpoint(__import__("pathlib").Path(args.model_dir))
    start = time.perf_counter()
    served = vllm_token_logprobs(str(served_dir), ids)
    vllm_seconds = time.perf_counter() - start

    report = {
        "tokens": len(ids) - 1,
        "served": served_what,
        "nll_fp32": float(-ref.mean()),
        "nll_4bit_hf": float(-quant.mean()),
        "nll_4bit_vllm": float(-served.mean()),
        "mean_abs_logprob_diff_hf": float((quant - ref).abs().mean()),
        "mean_abs_logprob_diff_vllm": float((served - ref).abs().mean()),
        "top1_agreement_hf": float((quant_top1 == ref_top1).float().mean()),
        "vllm_load_and_score_s": vllm_seconds,
    }
    report["nll_gap_vllm_rel"] = report["nll_4bit_vllm"] / report["nll_fp32"] - 1
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
