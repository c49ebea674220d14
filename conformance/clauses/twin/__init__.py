"""Area ``twin``: every method on a bitsandbytes base judged against its dense twin (declare, cases, checks, broken)."""
