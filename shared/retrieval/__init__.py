"""Retrieval maths both pipelines share: FAISS search (`search`), weighted kNN accuracy
(`knn`), recall@K / MAP@R (`metrics`) and the Shopee threshold sweep (`threshold`)."""
