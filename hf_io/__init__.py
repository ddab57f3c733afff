"""Reading and writing DeepSeek-V4 checkpoints in the Hugging Face release layout (safetensors with
FP8/FP4 blocks) and in this project's Orbax layout, one tensor at a time."""
