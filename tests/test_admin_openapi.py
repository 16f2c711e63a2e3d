"""The admin API tested against its own OpenAPI document with schemathesis:
generated requests (valid and invalid) through the whole app in memory (ASGI
transport, an admin key), and every answer must be no 500, a documented status,
the documented content type and a body matching the documented schema.

Checked: no 500, documented status codes, content types, headers (allow)
and bodies, auth enforced. Bounded for CI: 30 examples per operation, no
deadline, derandomized (the same cases every run): about 15 s on one core."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from gandalf.auth.apikey import generate_key
from gandalf.config import DatabaseConfig, GandalfConfig, KeyEntry
from gandalf.domain import Organization, ProviderConfig, Route, Target
from gandalf.server.asgi import GandalfApp
from gandalf.wiring import create_app

ADMIN = generate_key()


def _app() -> GandalfApp:
    return create_app(
        GandalfConfig(
            database=DatabaseConfig(dsn=":memory:"),
            providers=(ProviderConfig(name="fake", type="fake"),),
            routes=(
                Route(model_alias="fake-model", targets=(Target(provider="fake", model="f"),)),
            ),
            orgs=(Organization(id="acme", name="Acme", source="config"),),
            keys=(KeyEntry(name="admin", key=ADMIN, role="admin"),),
        ),
        access_log=False,
    )


# Loaded at collection (schemathesis' pytest fixture loader does not work with
# this pytest): it starts the app's lifespan on schemathesis' own event-loop
# thread, an in-memory store that lives until the test process exits.
schema = schemathesis.openapi.from_asgi("/admin/v1/openapi.json", _app())


@schema.parametrize()
@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_every_answer_matches_the_document(case: schemathesis.Case) -> None:  # type: ignore[type-arg]
    # positive_data_acceptance is left out: a schema-valid body may still be
    # refused for what it means (a team of an org that does not exist, a
    # route to an unknown provider): a 400 naming the field, which is right.
    case.call_and_validate(
        headers={"Authorization": f"Bearer {ADMIN}"}, excluded_checks=[positive_data_acceptance]
    )
