-- Lottery rounds (API.md, "Lottery rounds"; docs/lottery.md). Nothing here holds a citizen ID
-- or phone in clear: entries keep the same HMAC hashes and masked ID as reservations.

-- One row per lottery round, made with the round. `secret` is the 32 bytes committed to by
-- `commitment` (hex SHA-256); it is published (in the draw record) from the freeze on. The files
-- are the published bytes of allocator/draw.py, kept so that every answer is byte-exact.
CREATE TABLE draws (
    round_id         text PRIMARY KEY REFERENCES rounds,
    secret           bytea NOT NULL CHECK (length(secret) = 32),
    commitment       text NOT NULL CHECK (commitment ~ '^[0-9a-f]{64}$'),
    status           text NOT NULL DEFAULT 'registering'
                     CHECK (status IN ('registering', 'frozen', 'drawing', 'drawn')),
    frozen_at        timestamptz,
    entries          integer CHECK (entries >= 0),
    entries_csv      bytea,
    stock_csv        bytea,
    entries_digest   text,
    stock_digest     text,
    -- site_id -> units handed to the draw and its passes so far (stock.csv, then each pass's
    -- `released`): what came back since is the next pass's `released`
    accounted        jsonb,
    sites            jsonb,  -- the record's `sites` (winners null until the draw)
    public_randomness text,
    seed             text,
    drawn_at         timestamptz,
    results_csv      bytea,
    results_digest   text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE draw_passes (
    round_id   text NOT NULL REFERENCES draws,
    pass       integer NOT NULL CHECK (pass >= 1),
    at         timestamptz NOT NULL,
    released   jsonb NOT NULL,  -- [[site_id, units], ...] sorted by site_id, units > 0
    csv        bytea NOT NULL,
    digest     text NOT NULL,
    PRIMARY KEY (round_id, pass)
);

-- Who the draw (pass 0) and each pass placed where: the work list of the awards (each an
-- ordinary reservation made in Redis by lua/award.lua, idempotent per entry).
CREATE TABLE draw_awards (
    round_id  text NOT NULL REFERENCES draws,
    entry_id  text NOT NULL,
    pass      integer NOT NULL CHECK (pass >= 0),
    rank      integer NOT NULL CHECK (rank >= 1),
    site_id   text NOT NULL,
    PRIMARY KEY (round_id, entry_id)
);
CREATE INDEX draw_awards_by_pass ON draw_awards (round_id, pass, rank);

-- Entries, written by the ledger writer from the round's stream (kind=entry), like
-- reservations. `seq` is the round's change number of the last state written: a redelivered
-- or reordered older entry never overwrites a newer one. `not-drawn` is set by the draw itself.
CREATE TABLE entries (
    entry_id           text PRIMARY KEY,
    round_id           text NOT NULL REFERENCES rounds,
    receipt            text NOT NULL UNIQUE CHECK (receipt ~ '^[0-9a-f]{64}$'),
    site_id            text NOT NULL,
    accept_district    boolean NOT NULL,
    status             text NOT NULL
                       CHECK (status IN ('registered', 'withdrawn', 'excluded', 'won', 'not-drawn')),
    weight             integer CHECK (weight BETWEEN 1 AND 4),
    citizen_hash       text NOT NULL,
    phone_hash         text NOT NULL,
    citizen_id_masked  text NOT NULL,
    reservation_id     text,
    seq                bigint NOT NULL DEFAULT 0,
    created_at         timestamptz NOT NULL,
    updated_at         timestamptz NOT NULL,
    recorded_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX entries_by_round ON entries (round_id, status);

-- The service's Ed25519 draw key when ALLOT_DRAW_KEY is not set: generated once, by whichever
-- worker starts first, and kept here (one row). It signs entries; protect it like the pepper.
CREATE TABLE draw_key (
    id           boolean PRIMARY KEY DEFAULT true CHECK (id),
    private_key  text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
