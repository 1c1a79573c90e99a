"""Profile-driven planning: where to cut a model and which device holds each segment."""
