"""Schemathesis hooks: date-time strings inside the window the API accepts.

A JSON schema cannot say "at most one day from now", so the default generator would write years
up to 9999, which the API rightly refuses (422); numbers carry the bound in the schema itself.
"""

from datetime import UTC, datetime

import schemathesis
from hypothesis import strategies as st

schemathesis.openapi.format(
    "date-time",
    st.datetimes(min_value=datetime(1800, 1, 2), max_value=datetime.now()).map(
        lambda moment: moment.replace(tzinfo=UTC).isoformat()
    ),
)
