"""A producer that does not import handler code: an API server enqueues work its GPU workers run.

`declare` gives a type's payload model (validated here, at enqueue) and defaults, with no handler; a
type this process knows nothing of is accepted too (its workers register it). The CLI does the same:

    jobq enqueue --type thumbnail --payload '{"url": "s3://b/cat.png"}' --import examples.producer

Run: python examples/producer.py  (uses JOBQ_DATABASE_URL, or the embedded PostgreSQL)
"""

from __future__ import annotations

from pydantic import BaseModel

from jobqueue import Client, InvalidPayload, declare


class Thumbnail(BaseModel):
    url: str
    width: int = 256


declare("thumbnail", payload=Thumbnail, priority=5)


def main() -> tuple[dict[str, object], str, str]:
    with Client() as client:
        tid = client.enqueue("thumbnail", {"url": "s3://bucket/cat.png"})
        payload = client.get(tid).payload  # the model's defaults filled in
        try:
            client.enqueue("thumbnail", {"width": 64})  # no url: refused before anything is written
            refused = "accepted"
        except InvalidPayload as exc:
            refused = str(exc)
        other = client.enqueue("transcode", {"file": "talk.mp4"})  # unknown here: a worker elsewhere runs it
        kind = client.get(other).type
    print(payload, refused, kind, sep="\n")
    return payload, refused, kind


if __name__ == "__main__":
    main()
