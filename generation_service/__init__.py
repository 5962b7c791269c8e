"""The generation service: image generation jobs, their assets and variants."""
