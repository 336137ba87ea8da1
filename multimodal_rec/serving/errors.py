"""The error a client can fix: the app answers it with its HTTP status, details and headers."""


class RequestError(ValueError):
    def __init__(self, status: int, message: str, headers: dict | None = None, **details):
        super().__init__(message)
        self.status, self.details, self.headers = status, details, headers
