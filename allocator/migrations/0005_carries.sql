-- Carry-overs (issue 14): step (a) of a batch with `carry_from`, as lua/carry.lua recorded it on
-- the earlier round: the units each site gave (from its remaining stock and from expired
-- reservations) to the later round, which loads them as its batch `batch_id` (step (b), a row in
-- `batches`). A carry here without that batch row was interrupted; `allot reconcile` flags it,
-- and replaying the same request heals it. `allot rebuild` restores the earlier round's
-- `carried_out` from these rows.

CREATE TABLE carries (
    from_round   text NOT NULL REFERENCES rounds,
    to_round     text NOT NULL,
    batch_id     text NOT NULL,
    items        jsonb NOT NULL,  -- [[site_id, units], ...], only sites that gave units
    parts        jsonb NOT NULL,  -- [[site_id, from_remaining, from_expired], ...]
    units        integer NOT NULL CHECK (units >= 0),
    carried_at   timestamptz NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (from_round, to_round, batch_id)
);
