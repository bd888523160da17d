"""What the trainer loads and samples: the teacher, its denoiser families, text conditioning, the pipeline."""
