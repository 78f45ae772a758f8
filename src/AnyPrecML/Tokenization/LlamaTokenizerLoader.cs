using AnyPrecML.Models;
using Microsoft.ML.Tokenizers;

namespace AnyPrecML.Tokenization;

/// <summary>Finds and loads the SentencePiece tokenizer of a model through Microsoft.ML.Tokenizers.</summary>
public static class LlamaTokenizerLoader
{
    /// <summary>
    /// Loads <paramref name="tokenizerPath"/> (a SentencePiece tokenizer.model or a llama2.c tokenizer.bin), or the one
    /// found beside the checkpoint, and
    /// checks that its vocabulary fits the model. BOS is added when encoding; EOS is not.
    /// </summary>
    public static LlamaTokenizer Load(LlamaCheckpoint checkpoint, string? tokenizerPath = null)
    {
        string path = tokenizerPath ?? checkpoint.TokenizerPath
            ?? throw new FileNotFoundException($"No tokenizer found for '{checkpoint.SourcePath}': put tokenizer.model beside the model (or tok{checkpoint.Config.VocabSize}.model, tokenizer.bin or tok{checkpoint.Config.VocabSize}.bin beside a llama2.c file) or name one with --tokenizer.");
        var tokenizer = Load(path);
        if (tokenizer.Vocabulary.Count > checkpoint.Config.VocabSize)
            throw new ModelFormatException($"{path}: the tokenizer has {tokenizer.Vocabulary.Count} tokens but the model's vocabulary is {checkpoint.Config.VocabSize}.");
        return tokenizer;
    }

    /// <summary>Loads a SentencePiece tokenizer.model file, or a llama2.c tokenizer.bin (any vocabulary size) rebuilt as one in memory.</summary>
    public static LlamaTokenizer Load(string path)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"Tokenizer '{path}' does not exist.", path);
        bool llama2c = Llama2cTokenizerFile.IsLlama2c(path);
        using Stream stream = llama2c ? new MemoryStream(Llama2cTokenizerFile.ToSentencePieceModel(path)) : File.OpenRead(path);
        try
        {
            return LlamaTokenizer.Create(stream, addBeginOfSentence: true, addEndOfSentence: false);
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            throw new ModelFormatException(llama2c ? $"{path}: the llama2.c tokenizer does not make a SentencePiece model: {e.Message}"
                : $"{path}: not a SentencePiece tokenizer model: {e.Message}", e);
        }
    }
}
