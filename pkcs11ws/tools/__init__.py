"""The WSOP utilities: softcardtool, ckcheckinst, ckinfo-dynamic, cklist-dynamic, ckmechinfo."""
