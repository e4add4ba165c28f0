-- The ledger's high-water mark per round: the highest change sequence number (the round's `seq`
-- in Redis, carried in every ledger stream entry) whose entry has been committed here. It is
-- raised in the same transaction as the rows, and only ever raised (GREATEST). A Redis whose
-- `seq` for a round is below this has lost changes that the ledger has: allot then refuses the
-- round (503) until `allot rebuild` restores it. See docs/architecture.md, "Loss seen".

ALTER TABLE rounds ADD COLUMN ledger_seq bigint NOT NULL DEFAULT 0 CHECK (ledger_seq >= 0);
