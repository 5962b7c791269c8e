"""The generation service: generation jobs and their charge, workers' claims, assets and variants."""
