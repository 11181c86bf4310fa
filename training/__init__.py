"""Ray Train + DeepSpeed decomposer training: BC, Filtered BC, ILQL; model creation and loading."""
