"""Storage: the local disk store and its Azure Blob REST endpoint.

* :mod:`.pool`: the folder holding the store, on XFS with reflink when possible;
* :mod:`.diskstore`: accounts, containers, page/block blobs, snapshots, range diffs;
* :mod:`.extents`: reflink, sparse copies, hole punching, extent maps (FIEMAP);
* :mod:`.auth`: Shared Key and service SAS, as Azure checks them;
* :mod:`.blob_endpoint`: the Blob REST endpoint (FastAPI app, uvicorn entry point).
"""
