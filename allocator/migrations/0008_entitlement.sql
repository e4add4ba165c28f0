-- Entitlement (API.md "Entitlement: programmes, cooldown, eligibility"). The whole definition
-- stays in rounds.spec (the round hash as written, so a rebuild restores it); these columns are
-- what the ledger is queried by:
--   programme      the programme the round belongs to (NULL: none); its rounds bar each other
--   cooldown_days  how long a reservation in the round bars its citizen in the programme
--   key_tag        the Redis hash tag of the round's keys (r:<round> or p:<programme>), as the
--                  round-tags hash in Redis holds it (allocator/tags.py)
ALTER TABLE rounds ADD COLUMN programme text
    CHECK (programme IS NULL OR programme ~ '^[a-z0-9_-]{1,64}$');
ALTER TABLE rounds ADD COLUMN cooldown_days integer NOT NULL DEFAULT 0
    CHECK (cooldown_days BETWEEN 0 AND 365);
ALTER TABLE rounds ADD COLUMN key_tag text;
CREATE INDEX rounds_by_programme ON rounds (programme) WHERE programme IS NOT NULL;
