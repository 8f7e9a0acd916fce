"""Inputs that are not plain files (DICOMweb servers), each behind the same small seams:
listing units → ``InputFile`` references, and an opener for one reference's bytes."""
