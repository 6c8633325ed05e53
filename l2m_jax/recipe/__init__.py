"""The distillation recipe as library functions (what `python -m experiments.zephyr_distill` runs).

    from l2m_jax import recipe
    c = recipe.RecipeConfig(teacher="smollm2")                     # or an OmegaConf view of one
    recipe.check_config(c)
    run = recipe.Run(c, out)                                        # teacher, mesh, held-out texts
    rows = run.rows()                                               # synthesised + seed chat data (cached)
    plan = recipe.make_plan(c, run.teacher[0].n_layers)             # align -> stage1 -> sft -> dpo
    student = run.teacher
    for i, stage in enumerate(plan):
        record, student = recipe.run_stage(run, i, stage, student)
    recipe.export(run, lambda: student, plan[-1].name)
    recipe.write_run_report(run, plan, records)

or `recipe.pipeline(c, out)` for all of it, resumable. A draft for speculative decoding, distilled from the same
teacher on the same data: `recipe.build_draft`, `recipe.distill_draft`, `recipe.acceptance` (recipe/draft.py).
"""
from .config import RecipeConfig, UsageError, check_config  # noqa: F401
from .data import (chat_rows, distill_rows, heldout_ids, load_teacher, preference_rows, seed_prompts,  # noqa: F401
                   sft_rows)
from .draft import (DraftError, acceptance, build_draft, check_compatible, distill_draft,  # noqa: F401
                    draft_layer_ids, load_draft, save_draft, split_heldout)
from .run import (Run, evaluate, export, make_plan, pipeline, preference_eval, run_stage,  # noqa: F401
                  write_run_report)
