/* llama2.c's byte-pair tokenizer (the tokenizer.bin format: an int32
 * max_token_length, then per token a float32 score, an int32 length and
 * its bytes), with run.c's encoding and decoding rules. */
#ifndef KMV_LLAMA_TOKENIZER_H
#define KMV_LLAMA_TOKENIZER_H

#include <stddef.h>

typedef struct llm_tokenizer llm_tokenizer;

/* Read vocab_size tokens from path. Returns KMV_OK, KMV_EIO, KMV_EFORMAT
 * (a short or malformed file, or vocab_size below the 259 that byte
 * fallback needs) or KMV_ENOMEM, with a message in err. */
int llm_tokenizer_load(const char *path, int vocab_size, llm_tokenizer **out, char *err,
                       size_t err_len);
void llm_tokenizer_free(llm_tokenizer *t);

/* Tokens of text (UTF-8; bytes outside the vocabulary fall back to byte
 * tokens), with BOS (1) first when bos, as run.c's encode(): a leading
 * space token, then the greedy merges of the highest-scoring pairs.
 * *tokens is malloc'ed (free it); returns KMV_OK or KMV_ENOMEM. */
int llm_encode(const llm_tokenizer *t, const char *text, int bos, int **tokens, size_t *count);

/* The text of token after prev (run.c's decode(): the space after BOS is
 * dropped, <0xXX> tokens are that byte), valid while t is. */
const char *llm_decode(const llm_tokenizer *t, int prev, int token);

#endif /* KMV_LLAMA_TOKENIZER_H */
