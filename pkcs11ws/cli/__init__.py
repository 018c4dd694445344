"""The WSOP utilities (softcardtool, ckcheckinst, ckinfo-dynamic, cklist-dynamic, ckmechinfo)
and the install command. The top-level tools/ folder is something else: build scripts.
"""
