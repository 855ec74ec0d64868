"""What every lipfarm role shares: plans, storage, audio features, avatars, models, settings."""
