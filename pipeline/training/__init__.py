"""Training: the shared step and loop, parallel strategies, and the stages that call them."""
