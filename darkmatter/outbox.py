"""Placeholder, replaced below."""


class Outbox:
    def __init__(self, node):
        self.node = node

    def start(self):
        pass

    async def stop(self):
        pass
