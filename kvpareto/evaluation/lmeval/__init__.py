"""lm-evaluation-harness through our cache: the `kvpareto` model for lm-eval (`bridge`), the
`lm-eval:NAME` task family (`task`), and the tasks shipped here (`local_tasks/`)."""
