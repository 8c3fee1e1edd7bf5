"""Sample tables: prompts, responses and their scores as a markdown file a person can read."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import jax


def markdown_cell(value) -> str:
    """One table cell: floats to 4 significant digits; pipes escaped and newlines shown as ⏎, so the text
    stays on its row exactly as generated."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "⏎")


def sample_table(prompts: Sequence[str], responses: Mapping[str, Sequence[str]],
                 scores: Mapping[str, Sequence[float]] | None = None) -> str:
    """A markdown table with one row per prompt: the prompt, each named model's response, then each named
    score column (e.g. {"sft gold": [...], "ppo gold": [...], "ppo rm": [...]})."""
    scores = scores or {}
    columns = {"prompt": prompts, **responses, **scores}
    for name, values in columns.items():
        if len(values) != len(prompts):
            raise ValueError(f"sample_table: column {name!r} has {len(values)} rows for {len(prompts)} prompts")
    lines = ["| # | " + " | ".join(markdown_cell(c) for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for i in range(len(prompts)):
        lines.append(f"| {i + 1} | " + " | ".join(markdown_cell(v[i]) for v in columns.values()) + " |")
    return "\n".join(lines) + "\n"


def write_sample_table(path: str, title: str, prompts, responses, scores=None) -> None:
    """Writes `# title` and the sample table to path (process 0 only)."""
    if jax.process_index() != 0:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"# {title}\n\n{sample_table(prompts, responses, scores)}")
