"""Domain errors (services/errors.py) know nothing of HTTP; the HTTP layer gives each its
status (services/http.py STATUS), a subclass its nearest listed base's."""

from __future__ import annotations

import inspect

import pytest

from services import errors
from services.http import STATUS, http_status

DOMAIN_ERRORS = [cls for _, cls in inspect.getmembers(errors, inspect.isclass)
                 if issubclass(cls, errors.ServiceError)]


@pytest.mark.parametrize("cls", DOMAIN_ERRORS, ids=lambda cls: cls.__name__)
def test_every_domain_error_has_a_status_and_says_nothing_of_http(cls):
    assert "status" not in vars(cls)
    error = cls() if cls is errors.ClientDisconnected else cls("message")
    assert 400 <= http_status(error) < 600


@pytest.mark.parametrize(("error", "status"), [
    (errors.InvalidRequest("x", field="prompt"), 422), (errors.ModelNotFound("x"), 404),
    (errors.RateLimited("x"), 429), (errors.TooManyRequests("x"), 429), (errors.ClientDisconnected(), 499),
    (errors.InferenceFailed("x"), 500), (errors.NonFiniteOutput("x"), 500), (errors.BackendUnavailable("x"), 503),
    (errors.MemoryLimited("x"), 503), (errors.DeadlineExceeded("x"), 504), (errors.ServiceError("x"), 500),
])
def test_statuses_as_answered(error, status):
    assert http_status(error) == status


def test_a_new_subclass_takes_its_base_status():
    class QuotaSpent(errors.RateLimited):
        code = "quota_spent"

    assert QuotaSpent not in STATUS and http_status(QuotaSpent("x")) == 429
