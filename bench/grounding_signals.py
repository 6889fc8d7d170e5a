"""How well each grounding signal separates questions the documents answer from those they do not.

Reads the per-question records that `rag adapters calibrate` writes (``.cache/finetune/calibration/``):
the adapter's held-out validation articles in retrieval mode, gate open, abstention off. For each signal,
ROC AUC (scikit-learn) of answerable in-corpus questions against SQuAD 2.0 unanswerable ones and against
out-of-corpus ones, and the share of each kind abstained when the signal alone is cut where it keeps 90%
of the answerable questions. No generation runs here: the signals were recorded by the calibration run.

    python bench/grounding_signals.py [--records .cache/finetune/calibration/smollm2-squad-v2.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from common import REPO, update_section

SIGNALS = {  # name -> (description, value from a record; higher = more likely answerable)
    "relevance": ("best chunk's share of question terms", lambda s: max(s["relevance"], default=0.0)),
    "dense": ("best chunk's cosine similarity", lambda s: max((d for d in s["dense"] if d is not None), default=-1.0)),
    "answerability": ("best chunk's cross-encoder probability",
                      lambda s: max((a for a in s.get("answerability") or [] if a is not None), default=None)),
    "abstain preference (negated)": ("first-token preference for \"I don't know.\"",
                                     lambda s: None if s["abstain_preference"] is None else -s["abstain_preference"]),
    "confidence": ("mean token log-probability of the answer", lambda s: s["confidence"]),
    "support": ("answer words in the cited chunk",
                lambda s: max((s["support"][r - 1] for r in s["cited"]), default=0.0)),
    "evidence": ("question terms in the answer's sentence",
                 lambda s: max((s["evidence"][r - 1] for r in s["cited"]), default=0.0)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=Path, default=REPO / ".cache/finetune/calibration/smollm2-squad-v2.json")
    args = parser.parse_args()
    saved = json.loads(args.records.read_text())
    records = saved["records"] if isinstance(saved, dict) else saved
    kinds = {"answerable": [r for r in records if r["in_corpus"] and r["answerable"]],
             "unanswerable": [r for r in records if r["in_corpus"] and not r["answerable"]],
             "out of corpus": [r for r in records if not r["in_corpus"]]}
    lines = ["| signal | what it measures | AUC: answerable vs unanswerable | AUC: answerable vs out of corpus | "
             "cut keeping 90% of answerable: abstains on unanswerable / out of corpus |", "|---|---|---|---|---|"]
    for name, (what, value) in SIGNALS.items():
        values = {k: [value(r["signals"]) for r in rs] for k, rs in kinds.items()}
        if any(v is None for vs in values.values() for v in vs):
            lines.append(f"| {name} | {what} | not measured | | |")
            continue
        cut = float(np.quantile(values["answerable"], 0.10))

        def auc(other: str) -> str:
            if not values[other]:
                return ""
            labels = [1] * len(values["answerable"]) + [0] * len(values[other])
            return f"{roc_auc_score(labels, values['answerable'] + values[other]):.3f}"

        shares = [f"{100 * np.mean(np.array(values[k]) < cut):.0f}%" if values[k] else "" for k in
                  ("unanswerable", "out of corpus")]
        if cut <= min(values["answerable"]):  # a tenth of the answerable questions sit at the floor: no cut
            shares = ["no cut (ties at the floor)"]
        lines.append(f"| {name} | {what} | {auc('unanswerable')} | {auc('out of corpus')} | {' / '.join(shares)} |")
    counts = ", ".join(f"{len(v)} {k}" for k, v in kinds.items())
    scorer = saved.get("reranker_name") if isinstance(saved, dict) else None
    counts += f"; answerability from the cross-encoder {scorer}" if scorer else "; no cross-encoder in the run"
    table = "\n".join(lines)
    print(table)
    update_section("grounding-signals", "### Grounding signals, one by one (held-out validation articles)\n\n"
                   f"From `{args.records.relative_to(REPO) if args.records.is_relative_to(REPO) else args.records}`: "
                   f"{counts}.\n\n" + table)


if __name__ == "__main__":
    main()
