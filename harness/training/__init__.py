"""Fine-tuning methods with their memory carried: recipe, trainer, data, checkpoints and logs."""
