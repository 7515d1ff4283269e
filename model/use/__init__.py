"""A trained model put to use: scoring a test file, plotting a training log."""
