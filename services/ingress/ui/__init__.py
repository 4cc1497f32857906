"""The dashboard at `/ui`: static page files, sign-in with the master key, and its JSON endpoints under
`/v1/dashboard/` (see README, "The dashboard")."""
