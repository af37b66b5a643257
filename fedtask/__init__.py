"""fedtask: federated multitask learning on Flower, and the task-inference audit of it."""
__version__ = "0.1.0"
