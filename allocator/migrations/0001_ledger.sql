-- The durable record: operators' sites and rounds (written directly), and the ledger of batches
-- and reservations (written by the stream writer from Redis). Citizen IDs and phones are kept
-- only as HMAC-SHA256 hashes with ALLOT_ID_PEPPER, plus the masked ID.

CREATE TABLE sites (
    site_id     text PRIMARY KEY CHECK (site_id ~ '^[a-z0-9_-]{1,64}$'),
    name        text NOT NULL,
    address     text NOT NULL,
    district    text NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE rounds (
    round_id      text PRIMARY KEY CHECK (round_id ~ '^[a-z0-9_-]{1,64}$'),
    title         text NOT NULL,
    opens_at      timestamptz NOT NULL,
    closes_at     timestamptz NOT NULL,
    per_person    integer NOT NULL CHECK (per_person >= 1),
    pickup_start  timestamptz NOT NULL,
    pickup_end    timestamptz NOT NULL,
    mode          text NOT NULL DEFAULT 'fcfs',
    spec          jsonb NOT NULL,  -- the times as the operator gave them, offsets included
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CHECK (opens_at < closes_at AND pickup_start < pickup_end AND closes_at <= pickup_end)
);

CREATE TABLE batches (
    round_id     text NOT NULL REFERENCES rounds,
    batch_id     text NOT NULL,
    digest       text NOT NULL,
    items        jsonb NOT NULL,  -- [[site_id, units], ...]
    units        integer NOT NULL CHECK (units >= 1),
    loaded_at    timestamptz NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (round_id, batch_id)
);

CREATE TABLE reservations (
    reservation_id     text PRIMARY KEY,
    round_id           text NOT NULL REFERENCES rounds,
    site_id            text NOT NULL,
    quantity           integer NOT NULL CHECK (quantity >= 1),
    status             text NOT NULL CHECK (status IN ('confirmed', 'collected', 'cancelled', 'expired')),
    pickup_code        text NOT NULL,
    citizen_hash       text NOT NULL,
    phone_hash         text NOT NULL,
    citizen_id_masked  text NOT NULL,
    created_at         timestamptz NOT NULL,
    updated_at         timestamptz NOT NULL,
    recorded_at        timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX reservations_by_round_site ON reservations (round_id, site_id);
CREATE UNIQUE INDEX reservations_pickup_code ON reservations (round_id, site_id, pickup_code);
