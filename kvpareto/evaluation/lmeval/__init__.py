"""lm-evaluation-harness through our cache: the `kvpareto` model for lm-eval (`bridge`), the
`lm-eval:NAME` task family (`task`), and the tasks shipped here (`local_tasks/`)."""

from pathlib import Path

# kvpareto's own lm-eval tasks: YAML beside the module that generates their documents
LOCAL_TASKS = Path(__file__).parent / "local_tasks"
