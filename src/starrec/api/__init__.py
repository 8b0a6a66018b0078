"""Serving: any evaluated system behind an HTTP/JSON API (`star serve`) and one
question in the terminal (`star recommend`).

`service` binds a system to its serving data and answers requests (the library),
`schemas` is the wire contract, `app` the FastAPI application around a service.
"""
