"""The benchmark core every study stands on.

- `inputs`: the command-line inputs (preset, model, datasets), each dataset prepared once over one base model, and
  the identity of the data a cell depends on;
- `cells`: cells (one JSON record per finished piece of a study, keyed by its settings, computed at most once) and
  `Study`, the base class that collects the cells `--existing-only` leaves missing;
- `recipes`: what several studies compute the same way: ILA's mask with the library's defaults, the process's
  anonymous resident memory, and the library's brief training for step time and memory (every fine-tune goes
  through the library's one loop, `peft_ila.app.pipeline.finetune`);
- `stats`: overlaps, rank correlation, their random expectation, top-k through `resolve_top_k`, the overlap rules,
  `Runs` (fine-tunes by dataset and arm: metrics, pooled noise, differences ± SE) and the library's noise scale and
  2-SE rule (`peft_ila.app.judge`, which `peft-ila versus` judges with too);
- `page`: `Finding` (claim, verdict, evidence, rule) and the Markdown every page is made of (tables from column
  specs).
"""
