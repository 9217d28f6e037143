"""The method as completion requests to a serving engine: the interface, the stage-level method and its clients."""
