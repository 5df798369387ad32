/* The tool's commands; each returns the process exit status. */
#ifndef KMV_CLI_COMMANDS_H
#define KMV_CLI_COMMANDS_H

int cmd_matvec(int argc, char **argv);
int cmd_attention(int argc, char **argv);
int cmd_prefix(int argc, char **argv);
int cmd_decode(int argc, char **argv);
int cmd_regress(int argc, char **argv);
int cmd_demo(int argc, char **argv, const char *argv0);

#endif /* KMV_CLI_COMMANDS_H */
