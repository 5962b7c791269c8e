"""The token service: users, token accounts, the ledger, OTP login and plans."""
