"""The error a client can fix: the app answers it with its HTTP status and details."""


class RequestError(ValueError):
    def __init__(self, status: int, message: str, **details):
        super().__init__(message)
        self.status, self.details = status, details
