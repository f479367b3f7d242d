"""The paper's decoder setting: distil an OPT teacher into a smaller OPT on instruction data, score ROUGE-L.

Needs a GPU and the Hugging Face hub (or local copies); nothing here has been run at that scale by us, so no
numbers are committed. Configuration: ``examples/distill_opt_instructions.json`` (every field is
documented there). Per loss and seed: the repsim trainer with ``task="causal-lm"`` (next-token CE + T²-scaled
token-level KL to the teacher + β · feature loss on token-level hidden states of the mapped blocks), then greedy
generation on each evaluation set and the mean ROUGE-L F1 (:func:`repsim.distill.evaluation.rouge_l`) against the
references. Results: ``OUT/runs/LOSS/seedK/rouge.json``, ``OUT/runs.csv``, ``OUT/summary.md`` and paired tests
of the mean ROUGE-L across seeds (against ``none`` and ``cka``).

Difference from MiniLLM-style training: the loss covers every token of "prompt + response", not the response only.

    python examples/distill_opt_instructions.py --config examples/distill_opt_instructions.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import pandas as pd
import torch
from datasets import load_dataset

import repsim.distill as D
from repsim.distill.evaluation import rouge_l, summarize_grid

TEMPLATE = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\n{prompt}\n\n### Response:\n")


def _records(spec: dict) -> list[tuple[str, str]]:
    """(prompt, response) pairs from an hf dataset or a jsonl file, as the config describes."""
    prompt_keys = spec["prompt"] if isinstance(spec["prompt"], list) else [spec["prompt"]]
    if "jsonl" in spec:
        rows = [json.loads(line) for line in Path(spec["jsonl"]).read_text().splitlines() if line.strip()]
    else:
        rows = list(load_dataset(spec["hf"], split=spec.get("split", "train")))
    return [("\n\n".join(str(r[k]) for k in prompt_keys if r.get(k)), str(r[spec["response"]])) for r in rows]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 8) -> list[str]:
    tokenizer.padding_side = "left"
    outputs = []
    device = next(model.parameters()).device
    model.eval()
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer([TEMPLATE.format(prompt=p) for p in prompts[start:start + batch_size]], return_tensors="pt",
                          padding=True, truncation=True, max_length=512).to(device)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        outputs += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    tokenizer.padding_side = "right"
    return outputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, required=True)
    args = ap.parse_args()
    cfg = json.loads(args.config.read_text())
    out = Path(cfg["out"])
    pairs = _records(cfg["train_data"])
    holdout = int(cfg["train_data"].get("holdout", 0))
    train_pairs, held = pairs[:len(pairs) - holdout], pairs[len(pairs) - holdout:]
    train_texts = [TEMPLATE.format(prompt=p) + r for p, r in train_pairs]
    evals = {e["name"]: (held if e.get("from_train_holdout") else _records(e)) for e in cfg["eval_sets"]
             if e.get("from_train_holdout") or Path(e.get("jsonl", "")).exists() or "hf" in e}
    base = D.DistillConfig(task="causal-lm", features=cfg["features"], layer_map=cfg["layer_map"],
                           alpha=cfg["alpha"], beta=cfg["beta"], temperature=cfg["temperature"], epochs=cfg["epochs"],
                           batch_size=cfg["batch_size"], lr=cfg["lr"], max_length=cfg["max_length"],
                           device=cfg["device"], cache_teacher=False, first_token=cfg.get("first_token", "auto"))
    teacher = D.load(cfg["teacher"], "causal-lm")
    if cfg.get("finetune_teacher_epochs", 0):
        tcfg = dataclasses.replace(base, epochs=cfg["finetune_teacher_epochs"])
        teacher = (D.finetune(teacher, train_texts, config=tcfg, out=out / "teacher").student, teacher[1])
    rows = []
    for seed in cfg["seeds"]:
        for loss in cfg["losses"]:
            run_dir = out / "runs" / loss / f"seed{seed}"
            done = run_dir / "rouge.json"
            if not done.exists():
                run_cfg = dataclasses.replace(base, loss=loss, seed=seed)
                result = D.distill(teacher, cfg["student"], train_texts, None, config=run_cfg, out=run_dir)
                scores = {}
                for name, items in evals.items():
                    preds = generate(result.student, result.tokenizer, [p for p, _ in items],
                                     cfg["generation"]["max_new_tokens"])
                    scores[f"rougeL[{name}]"] = sum(rouge_l(p, r) for p, (_, r) in zip(preds, items, strict=True)) \
                        / max(1, len(items))
                scores["rougeL"] = sum(scores.values()) / max(1, len(scores))
                done.write_text(json.dumps(scores, indent=2))
                shutil.rmtree(run_dir / "student", ignore_errors=True)
                (run_dir / "checkpoint.pt").unlink(missing_ok=True)
            rows.append({"loss": loss, "seed": seed, **json.loads(done.read_text())})
        summarize_grid(pd.DataFrame(rows), out, "rougeL", f"{cfg['teacher']} → {cfg['student']}, ROUGE-L")
    print((out / "summary.md").read_text())


if __name__ == "__main__":
    main()
