"""driffusion_rt: DRiffusion draft-and-refine parallel sampling for diffusers models."""
