"""A training run: start-up checks (the dry run's too), the trainer, evaluation, collectives and
logging, resource estimates, accelerate launch configs."""
