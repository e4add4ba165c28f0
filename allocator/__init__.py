"""allot's domain: rounds, sites, batches and reservations, decided in Redis, kept in PostgreSQL."""
