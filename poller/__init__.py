"""satellite-poller: network polling workers that take jobs from RabbitMQ at remote sites."""

__version__ = "0.1.0"

__all__ = ["__version__"]
