"""What only the recipes (`recipes/`) and benchmarks use: task data and metrics, model loading, the recipes' stages
and reports. The core (`DistillationTrainer`, the cache, losses, heads) never imports this subpackage."""
