"""Per-task data loading, checks and evaluation for the recipes; the core never imports these."""
